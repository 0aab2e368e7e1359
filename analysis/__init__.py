"""Channel analysis: channel-equivalence groups from one table of op rules."""
