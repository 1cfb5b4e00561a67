"""The prefixes a failure message starts with to say whose fault it is, so that the release
matrix (releases/compat.py) can read the kind back from pytest's junit: ``[behaviour]`` a
package behaves differently from the table for its range (or gives non-finite numbers),
``[harness]`` the suite cannot drive that release."""
BEHAVIOUR_TAG, HARNESS_TAG = "[behaviour]", "[harness]"
