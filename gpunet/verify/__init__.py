"""Verification of results: judging copies that distinct providers computed (:mod:`gpunet.verify.quorum`)."""
