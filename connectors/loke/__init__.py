"""LOKE connector: OAuth2 client-credentials client, `X-Next-Page` paging, customer mapping."""

SOURCE = "loke"
