"""The worker side: running a job where it can be stopped (:mod:`.runner`) and the device a worker offers (:mod:`.device`)."""
