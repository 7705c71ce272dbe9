"""varstudent: distil a large teacher into a sparse, compressed Bayesian student.

Importing the package does nothing heavy; stages, tracking and plots import what they need.
"""

__version__ = "0.1.0"
