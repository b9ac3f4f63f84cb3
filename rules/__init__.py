"""The built-in rule families, one per TOML file; installed as the package ``msbnb_pass._rules``."""
