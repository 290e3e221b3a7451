"""hatchvm: self-hosted microVMs behind one REST API."""
