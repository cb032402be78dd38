//! The connect hook (filled in by the hook work).
