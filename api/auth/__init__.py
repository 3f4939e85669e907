"""Accounts: tokens, revocations, passwords, the auth routes and the bearer check."""
