"""An application of its own that sends its mail through the outbox.

Its own tables (``users``, ``password_resets``: :mod:`signup.models`), its own endpoints
(:mod:`signup.app`), and two mails put in the outbox in the same SQLAlchemy transaction as
the write they belong to (:mod:`signup.accounts`). ``outbox dispatcher`` sends them.
"""
