"""The launch catalog reads the same wherever a learner meets it."""

from catalog.seed import COURSES, PATHWAYS


def test_a_pathways_courses_are_titled_as_the_credentials_they_award() -> None:
    # The pathway's criteria and the learner's credential name each part by its credential's name;
    # the catalog, the enrollment and the email name it by the course's title.
    for pathway in PATHWAYS.values():
        for course_id in pathway.course_ids:
            course = COURSES[course_id]
            assert course.title == course.achievement.name
            assert course.achievement.name in pathway.achievement.criteria_narrative
