"""linectl: line control for electron-beam cable irradiation lines.

Process protection only: linectl never replaces the plant's personnel-safety system
or its hardwired beam inhibit.
"""

__version__ = "0.1.0"
