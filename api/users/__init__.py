"""``/api/v1/users``: the caller's own account and the admin listing."""
