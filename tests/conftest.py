"""Shared test setup: run from the repo root so `configs.*` imports work; keep XLA single-threaded-friendly."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
