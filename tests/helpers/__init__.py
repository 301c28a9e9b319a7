"""What several test modules share: references, random weights, small states, run recipes.

Test modules import from here (or get fixtures from conftest.py), never from each other.
"""
