"""`chat`, the terminal client: session (connect, join, read, reconnect), render (how
each line looks), pipe mode and terminal mode.  Imports chatd.wire only."""
