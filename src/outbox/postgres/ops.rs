//! Operator verbs against the PostgreSQL outbox.
