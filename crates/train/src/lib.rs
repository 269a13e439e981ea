//! vdit-train (in progress)
