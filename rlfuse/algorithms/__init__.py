"""One module per algorithm; each turns rewards into a per-step training loss."""
