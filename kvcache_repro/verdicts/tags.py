"""Whose fault a failure is, as its message's prefix (releases/compat.py reads it from junit):
``[behaviour]`` a package behaves unlike its range's table (or gives non-finite numbers),
``[harness]`` the suite cannot drive that release."""
BEHAVIOUR_TAG, HARNESS_TAG = "[behaviour]", "[harness]"
