from .main import service

service.run()
