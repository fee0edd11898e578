"""The Textual TUI. It reads one status snapshot at a time and sends commands through a
`StatusSource`; it never touches processes or sockets itself."""
