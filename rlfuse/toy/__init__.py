"""A procedural toy world of coloured shapes with captions, and a detector that reads it back."""
