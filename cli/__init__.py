"""Command-line front end of cpadgn (see cli.main)."""
