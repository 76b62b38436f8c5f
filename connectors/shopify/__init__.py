"""Shopify connector: GraphQL Admin API client, customer paginator, mappings, webhook HMAC.

Composition, not a template tree: `client.ShopifyClient` executes GraphQL with the cost budget,
`paginate.iter_customer_pages` walks `customers(sortKey: UPDATED_AT)`, `mapping` turns payloads
into `records.ForeignCustomer`, `webhooks` verifies `X-Shopify-Hmac-Sha256`.
"""
