"""Stand-alone studies (closed-form or cheap numerical experiments) that back claims in the issue notes."""
