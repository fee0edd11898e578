"""One click command (or group) per module; cli.py only assembles them."""
