"""The ``outbox`` command line: runs the services and operates the outbox."""
