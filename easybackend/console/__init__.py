"""The web console's files (HTML, CSS, ES modules), served by transports/http_console.py."""
