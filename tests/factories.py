import factory
from django.contrib.auth import get_user_model

from instances.models import ToolInstance
from tools.models import ToolDefinition

PASSWORD = "correct horse battery staple"


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.django.Password(PASSWORD)


class InstanceFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ToolInstance

    owner = factory.SubFactory(UserFactory)
    tool = factory.LazyFunction(lambda: ToolDefinition.objects.get(slug="json-transform"))
    name = factory.Sequence(lambda n: f"instance {n}")
    workflow_id = "workflow-1"
    status = ToolInstance.Status.ACTIVE
