"""The dashboard's four views (tabs): Cluster, Plan, Serve and Prompt."""
