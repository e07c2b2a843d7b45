"""Worker processes: each owns one device, keeps models resident, and runs jobs."""
