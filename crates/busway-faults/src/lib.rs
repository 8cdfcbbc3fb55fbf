//! Fault tests for busway's durable backends. The tests live in `tests/`; the
//! `busway-crash-child` binary is the process they kill.
//!
//! The child speaks a line protocol on stdout, printing a line only after the
//! backend has confirmed the operation:
//! - `busway-crash-child publish URL QUEUE FIRST_ID` publishes ids `FIRST_ID..`
//!   forever and prints `P <id>` once each publish is durable;
//! - `busway-crash-child consume URL QUEUE` prints `D <id>` for each delivery,
//!   acknowledges it and prints `A <id>` once the acknowledgement is durable.
