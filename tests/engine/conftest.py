"""The engine tests' shared pieces (toys.py: toy models and data; engine_workers.py and the test
modules: the spawned ranks' bodies) are imported by module name, in the test process and in every
rank halfbyte.comm.spawn starts; this folder on sys.path (which travels to the ranks) makes them
importable."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
