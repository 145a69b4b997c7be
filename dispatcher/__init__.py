"""The outbox dispatcher: claims due mail from PostgreSQL and delivers it over SMTP.

This package never imports ``api`` or FastAPI. Applications enqueue mail through
:mod:`dispatcher.outbox`, inside their own database transaction.
"""
