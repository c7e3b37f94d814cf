"""The pure, synchronous core: no I/O, no clock reads; time comes in as an argument."""
