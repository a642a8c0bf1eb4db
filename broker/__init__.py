"""certbroker: the broker between service-hall counter software and department records."""
