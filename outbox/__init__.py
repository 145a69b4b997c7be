"""The transactional outbox for email.

Put a mail in the outbox inside your own transaction::

    from outbox import Mail, enqueue

    async with session.begin():
        session.add(user)
        await enqueue(session, Mail(user.email, "Welcome", "Hello!"), key=f"welcome:{user.id}")

The parts live in the repository's top-level folders and are mapped into this package
(``outbox.dispatcher``: the daemon and the queue; ``outbox.api``: the registration
service; ``outbox.cli``: the ``outbox`` command; ``outbox.migrations``: the schema).
"""

from outbox.dispatcher.outbox import Enqueued, Mail, enqueue, set_default_sender

__all__ = ["Enqueued", "Mail", "enqueue", "set_default_sender"]
