"""The one exception type a user sees: a one-line message, never a traceback."""


class TrilemmaError(Exception):
    """A problem with the user's input or environment, phrased for the user.

    The command line prints ``str(error)`` on one line and exits with status 2. Anything
    that is not a TrilemmaError is a bug in trilemma or a model, and is reported in full.
    """


class ContractError(TrilemmaError):
    """A family that breaks a promise of the contract (:mod:`trilemma.contract.testing` checks them)."""
