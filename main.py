"""Launches Knowledge Neuron Studio: python main.py"""

from kn_gui.app import main

if __name__ == "__main__":
    raise SystemExit(main())
