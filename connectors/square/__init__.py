"""Square connector: SearchCustomers pulls, customer mapping, webhook signature checks."""

SOURCE = "square"
