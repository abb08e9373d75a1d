"""The errors ormkit raises.

Everything ormkit refuses or reports is an `OrmkitError`:

```
OrmkitError
├── ConfigurationError          a repository, factory or engine set up wrongly
├── NotFoundError               (also LookupError) a required row is missing
├── MultipleResultsError        one row was expected, several matched
├── TransactionError            a unit of work used wrongly, or one that cannot commit
└── InvalidArgumentError        (also ValueError) a bad argument value, refused before any SQL
    └── InvalidKeyError         a primary key of the wrong shape or kind
```

Errors raised by SQLAlchemy or the database driver (an `IntegrityError`, a lost connection)
pass through unchanged; where ormkit translates one, the original is the `__cause__`.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "MultipleResultsError",
    "NotFoundError",
    "OrmkitError",
    "TransactionError",
]


class OrmkitError(Exception):
    """Base class of every error ormkit raises itself."""


class ConfigurationError(OrmkitError):
    """Something is set up wrongly: a repository without a mapped model, a bad factory."""


class NotFoundError(OrmkitError, LookupError):
    """A row that had to exist does not; the message names the model and the key."""


class MultipleResultsError(OrmkitError):
    """A query expected to match at most one row matched several."""


class TransactionError(OrmkitError):
    """A unit of work was used wrongly, or its transaction cannot be committed."""


class InvalidArgumentError(OrmkitError, ValueError):
    """An argument has a bad value; refused before any SQL is sent."""


class InvalidKeyError(InvalidArgumentError):
    """A primary key value does not fit the model's primary key."""
