"""python -m rlfuse is python -m rlfuse.train."""
from rlfuse.train import main

main()
