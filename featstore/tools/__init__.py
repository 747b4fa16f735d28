"""What a user runs on a whole store: inspect, verify, export, upgrade.  Imports core/ and
read/; nothing imports tools/ but the command line."""
