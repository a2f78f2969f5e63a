"""The notebook side: the connection, placement, submission, job handles, verified jobs and the embedded network."""
