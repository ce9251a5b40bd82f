"""The tmdht client library for migration receivers and template publishers."""
