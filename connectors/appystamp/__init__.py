"""Appy Stamp connector: REST customers (cursor pages), activities (the stamp ledger), mapping."""

SOURCE = "appystamp"
