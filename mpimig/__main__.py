import sys

from . import pycmd
from .cli import main

# `python -m mpimig` imports mpimig from the current directory when it holds one (a checkout):
# the processes this one starts must import that same code (the console script never does this)
pycmd.pin()
sys.exit(main())
