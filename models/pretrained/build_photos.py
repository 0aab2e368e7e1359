"""Build the by-photo evaluation/calibration split (``photos/``, ``photos.json``, ``photo_crops.npz``).

Every distinct natural photo with a redistributable licence that the packages here provide:

* the 20 ImageNet validation images of the PyPI wheel ``foolbox==3.3.4`` (labelled; ImageNet terms of access:
  non-commercial research and education);
* scikit-image's bundled photos: colour ``astronaut``, ``rocket``, ``hubble_deep_field`` (public domain,
  NASA/SpaceX), ``chelsea``, ``coffee`` (CC0); grey ``camera``, ``brick``, ``grass``, ``gravel`` (CC0),
  ``clock`` (public domain), ``coins`` (no known copyright restrictions, Brooklyn Museum);
* scikit-learn's sample images ``china``, ``flower`` (CC BY 2.0, Flickr users danielbuechele and vultilion);
* Debian 12 packages: the twelve nature photos of ``mate-backgrounds`` (GPL-2+; authors in ``photos.json``)
  and ``Kleiber_by_Lukas_Baubkus.jpg`` of ``lomiri-wallpapers-20.04`` (CC-BY-SA-3.0), fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb -x`` (never installed).  The other wallpapers of these
  packages and of ``ukui-wallpapers``/``sway-backgrounds`` are drawings or abstract renderings, not photos.

Left out: scikit-image's microscopy/medical images, its stereo pair (licence not stated) and ``moon``
(licence not stated).

Split: within each source (names sorted), photos alternate eval, calib, eval, ...; so no photo is on both
sides.  Each photo is resized to a short side of 256 and stored as JPEG (quality 90).  Crop boxes: for each
photo, ``BOXES_PER_PHOTO`` random resized crops from a generator seeded by the photo's name.

Needs scikit-image, scikit-learn, Pillow, apt-get/dpkg-deb and network access to PyPI/Debian mirrors.

    python models/pretrained/build_photos.py
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import photo_split  # noqa: E402

ROOT = HERE.parents[1]
WHEELS = ROOT / "models" / "zoo" / "wheels"
SHORT_SIDE = 256
JPEG_QUALITY = 90
SEED = 0
CROP_SCALE, CROP_RATIO = (0.25, 1.0), (3 / 4, 4 / 3)
FOOLBOX = ("foolbox", "3.3.4")
FOOLBOX_MEMBER = re.compile(r"foolbox/data/imagenet_(\d+)_(\d+)\.jpg")  # index, ImageNet class

SKIMAGE = {  # name: (licence, author)
    "astronaut": ("public domain", "NASA"),
    "rocket": ("public domain", "SpaceX"),
    "hubble_deep_field": ("public domain", "NASA"),
    "chelsea": ("CC0", "Stefan van der Walt"),
    "coffee": ("CC0", "Rachel Michetti"),
    "camera": ("CC0", "Lav Varshney"),
    "brick": ("CC0", "CC0Textures"),
    "grass": ("CC0", "linolafett (DeviantArt)"),
    "gravel": ("CC0", "CC0Textures"),
    "clock": ("public domain", "Stefan van der Walt"),
    "coins": ("no known copyright restrictions", "Brooklyn Museum open collection"),
}
SKLEARN = {"china": ("CC BY 2.0", "danielbuechele (Flickr)"), "flower": ("CC BY 2.0", "vultilion (Flickr)")}
MATE_NATURE = {  # from mate-backgrounds' debian/copyright
    "Aqua": "Charles Barbin", "LadyBird": "Charles Barbin", "YellowFlower": "Charles Barbin",
    "Garden": "Charles Barbin", "Blinds": "Lennart Poettering, Andrea Cimitan",
    "Dune": "Marco Cogoni, Hylke Bons", "FreshFlower": "Jens Ansorg",
    "GreenMeadow": "Timothy Schellhase, Lapo Calamandrei", "RainDrops": "blackcombwhistler07",
    "Storm": "Sergey Nazarov", "TwoWings": "Charles Barbin, Hylke Bons", "Wood": "Jean-François Fortin Tam",
}
LOMIRI = {"Kleiber_by_Lukas_Baubkus": "Lukas Baubkus"}


def fetch_wheel(name: str, version: str) -> Path:
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(WHEELS.glob(pattern))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        f"{name}=={version}", "-d", str(WHEELS)], check=True)
        found = sorted(WHEELS.glob(pattern))
    return found[0]


def debian_files(package: str, pattern: str, workdir: Path) -> tuple[str, list[Path]]:
    """(package version, files matching ``pattern``) of a Debian package, downloaded and unpacked (not installed)."""
    subprocess.run(["apt-get", "download", "-q", package], cwd=workdir, check=True, capture_output=True)
    deb = next(workdir.glob(f"{package}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir / package)], check=True)
    version = deb.name.split("_")[1]
    return version, sorted((workdir / package).glob(pattern))


def gather(workdir: Path) -> list[tuple[dict, Image.Image]]:
    """Every photo with its record (without side), grouped by source, names sorted within a source."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = []
    with zipfile.ZipFile(fetch_wheel(*FOOLBOX)) as wheel:
        members = sorted((m for m in wheel.namelist() if FOOLBOX_MEMBER.fullmatch(m)),
                         key=lambda m: int(FOOLBOX_MEMBER.fullmatch(m).group(1)))
        for member in members:
            index, label = FOOLBOX_MEMBER.fullmatch(member).groups()
            out.append(({"name": f"imagenet_{int(index):02d}", "source": f"PyPI wheel foolbox==3.3.4 ({member})",
                         "licence": "ImageNet terms of access (non-commercial research and education)",
                         "author": "ILSVRC 2012 validation set", "label": int(label)},
                        Image.open(io.BytesIO(wheel.read(member))).convert("RGB")))
    for name in sorted(SKIMAGE):
        licence, author = SKIMAGE[name]
        out.append(({"name": name, "source": f"scikit-image skimage.data.{name}()", "licence": licence,
                     "author": author, "label": -1}, Image.fromarray(getattr(skimage.data, name)())))
    samples = load_sample_images()
    for filename, image in sorted(zip(samples.filenames, samples.images)):
        name = Path(filename).stem
        licence, author = SKLEARN[name]
        out.append(({"name": name, "source": f"scikit-learn load_sample_images() {name}.jpg", "licence": licence,
                     "author": author, "label": -1}, Image.fromarray(image)))
    version, files = debian_files("mate-backgrounds", "usr/share/backgrounds/mate/nature/*.jpg", workdir)
    debian = [(f, f"Debian 12 package mate-backgrounds {version}", "GPL-2+", MATE_NATURE[f.stem]) for f in files]
    version, files = debian_files("lomiri-wallpapers-20.04", "usr/share/backgrounds/Kleiber*.jpg", workdir)
    debian += [(f, f"Debian 12 package lomiri-wallpapers-20.04 {version}", "CC-BY-SA-3.0", LOMIRI[f.stem])
               for f in files]
    for path, source, licence, author in sorted(debian, key=lambda d: d[0].stem):
        out.append(({"name": path.stem, "source": f"{source} ({path.name})", "licence": licence, "author": author,
                     "label": -1}, Image.open(path)))
    return out


def source_key(record: dict) -> str:
    return record["source"].split(" ")[0] + (":grey" if record["name"] in
                                               ("camera", "brick", "grass", "gravel", "clock", "coins") else "")


def assign_sides(records: list[dict]) -> None:
    """Alternate eval/calib within each source (in the given order), so both sides mix every source."""
    seen: dict[str, int] = {}
    for record in records:
        key = source_key(record)
        record["side"] = photo_split.SIDES[seen.get(key, 0) % 2]
        seen[key] = seen.get(key, 0) + 1


def shrink(image: Image.Image) -> Image.Image:
    """Short side to ``SHORT_SIDE`` (bilinear with antialiasing, as torchvision's Resize on PIL images)."""
    grey = image.mode in ("L", "I;16") or (image.mode == "RGB" and _is_grey(image))
    image = image.convert("L" if grey else "RGB")
    scale = SHORT_SIDE / min(image.size)
    size = (max(SHORT_SIDE, round(image.size[0] * scale)), max(SHORT_SIDE, round(image.size[1] * scale)))
    return image.resize(size, Image.BILINEAR)


def _is_grey(image: Image.Image) -> bool:
    pixels = np.asarray(image)
    return bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())


def crop_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """A random resized crop (torchvision's RandomResizedCrop rule): top, left, height, width."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = np.exp(rng.uniform(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1])))
        w, h = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def photo_boxes(name: str, height: int, width: int) -> np.ndarray:
    """``BOXES_PER_PHOTO`` rows [top, left, height, width, flip] from a generator seeded by the photo's name."""
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    rows = []
    for _ in range(photo_split.BOXES_PER_PHOTO):
        rows.append((*crop_box(rng, height, width), int(rng.random() < 0.5)))
    return np.array(rows, dtype=np.int16)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        gathered = gather(Path(tmp))
        photo_split.PHOTOS_DIR.mkdir(exist_ok=True)
        for old in photo_split.PHOTOS_DIR.glob("*.jpg"):
            old.unlink()
        records, boxes = [], {}
        for record, image in gathered:
            small = shrink(image)
            small.save(photo_split.PHOTOS_DIR / f"{record['name']}.jpg", quality=JPEG_QUALITY)
            record["size"] = list(small.size[::-1])
            records.append(record)
    assign_sides(records)
    rng = np.random.default_rng(SEED)
    ordered = []
    for side in photo_split.SIDES:  # a fixed shuffle within each side: the first P photos mix the sources
        members = [r for r in records if r["side"] == side]
        ordered += [members[i] for i in rng.permutation(len(members))]
    photo_split.MANIFEST.write_text(json.dumps(
        {"about": "see build_photos.py; size is [height, width] as stored; label -1 = unlabelled",
         "photos": ordered}, indent=1, ensure_ascii=False) + "\n")
    photo_split.manifest.cache_clear()
    for record in ordered:
        stored = photo_split.photo(record["name"])
        boxes[f"{record['side']}/{record['name']}"] = photo_boxes(record["name"], *stored.shape[:2])
    np.savez_compressed(photo_split.CROPS_PATH, **boxes)
    total = sum(f.stat().st_size for f in photo_split.PHOTOS_DIR.glob("*.jpg"))
    counts = {side: sum(r["side"] == side for r in ordered) for side in photo_split.SIDES}
    print(f"{len(ordered)} photos ({counts}), {total / 1e6:.2f} MB of JPEG, "
          f"{photo_split.CROPS_PATH.stat().st_size / 1e3:.0f} kB of boxes", file=sys.stderr)


if __name__ == "__main__":
    main()
