"""The citizen's side: the ``certbroker.v1.Citizen`` service (who looked at my records, and a
dispute), the notices of every access (:mod:`.notices`) and their relay to a message broker
(:mod:`.relay`)."""
