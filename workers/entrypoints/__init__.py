"""Every way in (command line, HTTP API, client, demo); nothing else imports it."""
