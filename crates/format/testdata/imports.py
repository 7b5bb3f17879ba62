"""A module importing the ways real modules do, compiled by CPython 3.11 into
imports.cpython-311.pyc for the compiled-module scan's test:
python3.11 -c "import py_compile; py_compile.compile('imports.py', 'imports.cpython-311.pyc')"
"""
from __future__ import annotations

import os
import email.mime.text
from collections import abc
from . import sibling

try:
    import json.decoder
except ImportError:
    json = None

copy = os.path.join("types", "select")


class Table:
    from decimal import Decimal

    def load(self):
        import subprocess

        return subprocess


def parse(text):
    from xml.etree import ElementTree

    return ElementTree.fromstring(text)
