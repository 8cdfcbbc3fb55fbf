//! Embedded durable transport for busway on SQLite.
