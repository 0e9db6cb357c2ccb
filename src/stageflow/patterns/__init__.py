"""One file per architecture; each describes what runs and leaves the how to the engine."""
